"""Evaluation, visualisation and result-file callbacks, and the streaming metrics behind them."""
