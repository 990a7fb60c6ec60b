"""The NBD server: archive points served as block devices for instant recovery."""
