"""Using a trained model (and a token store): decode tokens back to galaxies, draw grids, and the demo.
The trainer ends at a checkpoint (`astropt_train.checkpoint`); everything that reads one afterwards lives here."""
