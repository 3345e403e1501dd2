# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Data for the scripts, as `datasets` objects and tensors.

- `images`: images decoded from files and `datasets` columns, with errors that name the damaged file.
- `anomaly/`: anomaly-detection data (MVTec AD's layout, a plain folder, a Hub dataset) in one column schema, the
  validation split, and the tensors MAF trains and scores on (`from hf_dgm_training.data.anomaly import ...`).
- `unpaired`: CycleGAN's unpaired domains, with the reference's sampling and augmentation.

The subpackages are imported where they are used (they import `datasets` and the model packages' image processors).
"""
