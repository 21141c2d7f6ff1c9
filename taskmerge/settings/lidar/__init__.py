"""The LiDAR setting (spec lidar): WaffleIron-768 encoders pretrained by ScaLR, their releases and, later, the
nuScenes / SemanticKITTI / Panda64 / PandaGT tasks. Not registered in `taskmerge.settings.SETTINGS` yet."""
