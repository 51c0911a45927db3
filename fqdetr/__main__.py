from fqdetr.cli import main

raise SystemExit(main())
