"""StreetHazards data: the datamodule, anomaly injection and the synthetic dataset writer."""
