"""The pneumonia classifier (Keras 3 on TensorFlow): config, models, input pipeline, inference.

Modules: ``config`` (the ``train_classifier`` params schema and head/loss rules), ``models``
(architecture builders), ``data`` (tf.data over the augment cache), ``callbacks`` (dvclive
logging, best-epoch restore), ``predict`` (load the saved model, class probabilities), and the
evaluate half's ``evaluate``/``metrics``/``gradcam``/``report``. The stage itself is
``python -m stages.train --task classification``.

Nothing is imported here on purpose: ``stages.classifier.config`` must stay importable without
TensorFlow, and each caller imports the module it needs.
"""
