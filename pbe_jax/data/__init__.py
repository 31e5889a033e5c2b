"""Training data: image sources with boxes (`sources`: TFDS and folders; `shards`: prepared ArrayRecord shards,
written by `prepare`; `synthetic`), photos decoded once and upright (`photos`), the paper's self-supervised
pairs built on the host (`pairs`), the grain pipeline that shards, shuffles and batches them (`loader`), and
the augmentation and mask shapes that run on the device (`augment`). Importing this package loads no grain,
tfds or TensorFlow."""
