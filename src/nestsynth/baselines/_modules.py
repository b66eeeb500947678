"""Imports every module that registers a method (the order is the listing order)."""

