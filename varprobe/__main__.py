from varprobe.cli import main

main()
