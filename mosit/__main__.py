from mosit.cli import main

main()
