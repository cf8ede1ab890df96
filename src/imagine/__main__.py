from imagine.cli import main

main()
