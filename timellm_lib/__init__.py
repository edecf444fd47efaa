"""Time-LLM forecasting workbench: model, TAPR/GRA-M modules and a bit-identical resumable trainer."""

__version__ = "0.1.0"
