"""CoProV2 data: the taxonomy of harmful concepts, prompt writers and the dataset builder."""
