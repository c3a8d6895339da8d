import sys
from tinylora.cli import main

sys.exit(main())
