"""astropt_tok: stream a survey through the AION image codec into a sharded int16 token store."""

__version__ = "0.1.0"
