from ntkrun.entry import main

main()
