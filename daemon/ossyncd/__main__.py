from ossyncd.cli import entry

entry()
