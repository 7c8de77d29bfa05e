"""What runs a stage: build, the loop, checkpoints, run directories, logs, sharding, io."""
