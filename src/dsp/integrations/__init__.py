"""Integrations with model libraries: their models' declarations, as data.

Each subpackage imports its library only when used (``import dsp`` never imports it):
:mod:`dsp.integrations.diffusers` for diffusers' video models.
"""
