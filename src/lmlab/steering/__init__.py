"""Activation steering: directions, interventions, refusal evaluation, the sweep family."""
