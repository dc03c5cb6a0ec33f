from vctmae.cli import main

main()
