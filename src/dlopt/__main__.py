from dlopt.cli import main

main()
