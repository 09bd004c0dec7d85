"""Training: the poster's loss, the ignite handlers of training and validation, the recipe that
runs every stage."""
