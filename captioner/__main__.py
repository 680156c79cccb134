from captioner.apps.cli import main

raise SystemExit(main())
