"""loghandler's trial tests."""
