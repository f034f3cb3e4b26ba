"""astropt_train: a lean AstroPT trainer that reads memory-mapped token shards and never runs the codec in its loop."""
