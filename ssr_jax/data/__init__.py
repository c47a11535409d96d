"""Data layer: span corruption, SSR mask/rewrite (token ids), packing, input pipeline."""
