from tests.sources.scripted_broker import broker

__all__ = ["broker"]
