"""What a run writes: each image's files, the overlay picture, the summary table, the
gallery page, and the folder watch that feeds a run from a camera's folder."""
