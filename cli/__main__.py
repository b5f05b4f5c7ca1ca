from clips4.cli import main

raise SystemExit(main())
