from openworld.cli import main

raise SystemExit(main())
