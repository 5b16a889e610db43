"""Foundations every layer uses: errors, atomic files, package data, fetched assets, identity hashes."""
