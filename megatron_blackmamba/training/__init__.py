"""Training: model/optimizer setup, the forward-backward step, LR schedule, the loop."""
