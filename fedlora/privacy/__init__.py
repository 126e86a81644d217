"""What bounds one participant's contribution: update clipping (and, with DP, noise and accounting)."""
