"""Small shared helpers: atomic files, resumable JSON Lines, devices."""
