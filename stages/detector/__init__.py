"""The thoracic-finding detector (torchvision RetinaNet): params schemas, augmentation, data,
model, training core, evaluation, reports.

Modules: ``config`` (the ``train_detector``, ``augment.detection`` and ``evaluate.detection``
schemas, importable without torch), ``augment`` (box-aware transforms), ``data`` (the cache as a
torch Dataset), ``model`` (build / save / load / predict), ``engine`` (train_one_epoch, mAP on
validation, checkpoints, DDP), ``train`` (``train(cfg)``), and the evaluate half's ``evaluate`` /
``froc`` / ``report``. Nothing is imported here: callers import the module they need.
"""
