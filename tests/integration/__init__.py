"""
Integration tests against emulators (moto for S3) run as child processes.
"""
