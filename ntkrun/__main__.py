from ntkrun.cli import main

main()
