"""The classifier stage (the paper's Tables 5-6): does synthetic data help classify *real* cells?

    python tools/classify.py shards=REAL [synthetic=SYN] arch=small_cnn regime=original out=RUN_DIR

  archs.py       architectures by name (timm's inception_v3, resnet50, vgg16/19 (_bn), legacy_xception;
                 small_cnn = the cell extractor's CellNet); pretrained weights only from a staged file
  regimes.py     the data regimes (original, synthetic, aug1-3, original+synthetic, balanced, weighted_loss,
                 logit_adjust) and their losses
  data.py        a regime's training set as one shard index over real and synthetic shards; val/test decoding
  augment.py     the augmentation recipes (torchvision v2, from config)
  provenance.py  the leakage guard: a synthetic set whose GAN saw the test split (or more of a scarce class
                 than the classifier's cut) is refused
  (the scarce cut of the scarcity study, shared with GAN training, is hpcgan.data.scarce)
  metrics.py     accuracy, macro-F1, balanced accuracy, per-class precision/recall/specificity/F1 (scikit-learn),
                 confusion matrix CSV and PNG
  schedule.py    the learning rate and the stopping rule (cosine, plateau, a refit's replay)
  refit.py       a finished run's choices (best step, decays), to train again on train + val
  run.py         ClassifySettings, the training loop (DDP, bf16, checkpoints, exact resume), scoring, results rows
"""
