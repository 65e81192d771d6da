"""Did it help? The trained model against its base on held-out rows, and the verdict."""
