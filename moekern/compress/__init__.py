"""Compression: calibration one decoder layer at a time, the methods that decide what to drop or quantize, and the
recipe that orders them. The structural edits themselves are in moekern.surgery."""
