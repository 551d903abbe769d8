"""Model diffing: what LoRA model organisms represent differently from their clean base.

``organisms`` names and builds the organisms lmlab makes itself (LoRA adapters with one
planted quirk each, cached by content), ``train`` is their training recipe, and
``behaviour`` checks in generated text that an organism really has its quirk.
"""
