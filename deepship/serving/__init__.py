"""The serving process (see the serving issue): loads built variants and answers requests."""
