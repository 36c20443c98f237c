"""What a run leaves for people to read: MLflow runs, plots and sweep summaries."""
