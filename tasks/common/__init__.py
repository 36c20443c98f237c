"""User errors and files on disk: what every other part of the pipeline uses."""
