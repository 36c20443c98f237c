"""Named data sets: where each split lives, loading them, and drawing calibration windows."""
