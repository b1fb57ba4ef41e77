"""The lung segmenter (a MONAI U-Net): params schemas, paired augmentation, data, model,
training core, evaluation, reports, and the predicted-mask API.

Modules: ``config`` (the ``train_segmenter``, ``augment.segmentation`` and
``evaluate.segmentation`` schemas, importable without torch), ``augment`` (paired image/mask
transforms), ``data`` (the cache's images and masks as batches), ``model`` (build / save / load /
probabilities), ``engine`` (loss, optimiser, schedule, one epoch, validation Dice, checkpoints),
``train`` (``train(cfg)``), the evaluate half's ``evaluate`` / ``metrics`` / ``report``, and
``predict`` (lung masks and boxes for films of any size). Nothing is imported here: callers
import the module they need; nothing in the package imports TensorFlow.
"""
