from tests.flower_identity import flower_identity

__all__ = ["flower_identity"]
