from winkr.cli import main

raise SystemExit(main())
