from ossyncd.cli import main

main()
