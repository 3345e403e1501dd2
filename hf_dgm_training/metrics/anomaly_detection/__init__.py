"""The `anomaly_detection` evaluate module (anomaly_detection.py) and its numpy core (ranking.py)."""
