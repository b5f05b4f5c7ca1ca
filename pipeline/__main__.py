from clips4.pipeline.cli import main

raise SystemExit(main())
