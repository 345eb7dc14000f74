"""qvl-data: offline, validated Qwen2.5-VL SFT data."""

__version__ = "0.1.0"
