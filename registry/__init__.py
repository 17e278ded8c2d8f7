"""What models exist and where their files are: catalog, names, downloads, the local store."""
